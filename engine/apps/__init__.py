"""Where the parts are wired together, one composition root per process: the CLI, serve,
the lake writer process, replay and its detection fork, backtest, simulate, the demo."""
