"""What the mirror tells its operator: metrics, one log line per client request, health and a status page.
Never a secret, and on unauthenticated pages never an identity (user, client address)."""
