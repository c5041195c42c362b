"""Network Time Security (RFC 8915): NTS-KE over TLS 1.3 and NTS-authenticated NTPv4.

Everything here is sans-IO except :mod:`timesyncd.nts.ke_io`, a small asyncio driver.
"""
