"""The trainer side: what a user's training loop imports (the manifest loader, online JEST)."""
