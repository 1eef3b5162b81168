from recare_cli.cli import main

main()
