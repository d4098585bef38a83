"""The security team's web console and its JSON API (`callsentry console`).

accounts: the people and API tokens allowed in (their file in the data dir);
safety: sign-in throttling, CSRF tokens, the headers every answer carries;
lakeview: what the pages read from the lake (read-only, never the analysts' file);
tariffs: the tariff list behind the queue's estimated exposure;
chart: the server-drawn SVG charts; web: the application, its pages and its API.
"""
