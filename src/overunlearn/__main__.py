from overunlearn.cli import main

main()
