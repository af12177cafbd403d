"""Help for people debugging registry traffic: mitmproxy content views and credential fingerprints."""
