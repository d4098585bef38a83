from engine.apps.cli import main

main()
