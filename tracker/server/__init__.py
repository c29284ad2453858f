"""Network servers on top of the services: the Faktory Work Protocol endpoint
(``fwp``, ``tracker serve``), and later the proxy and the web app."""
