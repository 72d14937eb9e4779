from field_client.cli import main

main()
