"""Images kept warm (``hub_prefetch``): a list of image references pulled into the cache at start
and checked again every ``hub_prefetch_interval``.

``listfile.py`` reads the list (a malformed one stops the mirror), ``tokens.py`` gets the
mirror's own tokens (server-side credentials only), ``warm.py`` brings one image into the
cache through the mirror's own fetch path, ``rounds.py`` runs the rounds (once among the
processes sharing a bucket) and keeps what the status page and the metrics show.
"""
