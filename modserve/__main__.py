from modserve.cli import main

main()
