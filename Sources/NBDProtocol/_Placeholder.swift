// Placeholder until the target has code; delete when it does.
