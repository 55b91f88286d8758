//! parley: a real-time chat and notification server.
