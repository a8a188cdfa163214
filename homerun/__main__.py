from homerun.cli import main

main()
