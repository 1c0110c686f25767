from runex.cli import main

main()
