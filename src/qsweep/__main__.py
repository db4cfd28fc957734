from qsweep.cli import main

main()
