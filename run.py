from handforge.cli import main

main()
