"""The project's user-facing error type; importing it costs nothing (no JAX, no torch)."""


class UserError(ValueError):
  """A mistake the user can fix by changing a setting; `main` prints it as one `error:` line
  (no traceback) and exits with status 2. The message names the setting and the fix."""
