"""The build pipeline: a tuple of stages run in order over one BuildState, in a Workspace that
publishes the bundle atomically."""
