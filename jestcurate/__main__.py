from jestcurate.cli import main

main()
