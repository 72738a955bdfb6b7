"""High availability: Patroni's REST API (patroni.py); later, running the HA stack (stack.py)."""
