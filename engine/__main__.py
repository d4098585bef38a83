from engine.apps.cli import run

run()
