from capfast.cli import main

main()
