"""schedule run, schedule show and cron: the scheduler commands."""

from __future__ import annotations
