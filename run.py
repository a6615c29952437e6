from handforge.entry import main

main()
