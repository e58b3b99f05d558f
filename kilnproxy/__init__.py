"""kilnproxy: the SSH front door of a Git and Mercurial hosting service."""
