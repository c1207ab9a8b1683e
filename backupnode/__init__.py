"""Backup node (`standby-backup`): reads a frozen snapshot over NBD and streams it to an archive."""
