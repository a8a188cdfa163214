from homerun.cli.app import main

main()
