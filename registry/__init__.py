"""The registry: stations, vehicles and theft cases, and the stolen-tag snapshot."""
