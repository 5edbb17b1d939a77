"""medreg.metrics"""
