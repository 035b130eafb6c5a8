from apo_merge.cli import main

main()
