"""Adapter tools that make new adapters from old ones or from models: extract, combine."""
