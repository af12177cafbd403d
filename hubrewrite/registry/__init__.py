"""Registry protocol formats the mirror reads: tokens, challenges, manifests."""
