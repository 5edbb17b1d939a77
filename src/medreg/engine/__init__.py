"""medreg.engine"""
