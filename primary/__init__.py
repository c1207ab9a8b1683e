"""Primary agent (`standby-primary`): exports the protected volume over NBD and mirrors every write,
in order, to the standby. Built on `standbylib`; see docs/ARCHITECTURE.md."""
