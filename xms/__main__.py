from xms.cli import main

main()
