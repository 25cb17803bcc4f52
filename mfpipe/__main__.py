from mfpipe.cli import main

main()
