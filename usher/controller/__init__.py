"""The Usher controller (usherctrl): global state, requests, plugins, links."""
