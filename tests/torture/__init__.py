"""The fault suite: the watcher's promise checked after real faults (see docs/faults.md)."""
