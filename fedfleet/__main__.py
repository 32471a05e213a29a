from fedfleet.cli.app import main

main()
