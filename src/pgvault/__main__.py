from pgvault.entry import main

main()
