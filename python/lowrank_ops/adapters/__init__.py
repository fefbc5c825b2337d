"""PEFT methods."""
