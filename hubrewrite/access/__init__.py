"""Who may do what: mirror accounts and the tokens issued to them, the operator's
allow/deny rules and upstream accounts, and which cached content a client may read."""
