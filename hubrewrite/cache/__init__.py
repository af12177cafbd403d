"""The pull-through cache: the store on disk, downloads followed by every client, and the servers that send blob bytes."""
