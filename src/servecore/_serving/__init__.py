"""The data plane's private parts: router statistics and the ingress's operator routes.

The public modules ``servecore.router`` and ``servecore.http`` hold the router, the
handles and the HTTP ingress; this package keeps what they share with status and metrics.
"""
