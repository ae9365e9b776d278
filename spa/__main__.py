from spa.cli.commands import main

main()
