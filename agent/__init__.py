"""The agent: the edge daemon, the client library that training code calls, the Trainer protocol and built-in tasks."""
