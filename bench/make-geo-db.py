"""Writes a MaxMind-format database (GeoLite2-City's layout) of NETWORKS random IPv4 /24
networks, seeded, for `scripts/bench`'s enrichment measurements: a search tree of a realistic
depth (a free City database holds a few million networks), with addresses the benchmark's
requests come from. Usage: make-geo-db.py NETWORKS OUT.mmdb ADDRESSES.txt (one address per
network is written to ADDRESSES.txt). Needs mmdb-writer (scripts/bench installs it).
"""

import random
import sys

from mmdb_writer import MMDBWriter
from netaddr import IPNetwork, IPSet

PLACES = [
    ("DE", "Germany", "Berlin"), ("FR", "France", "Paris"), ("US", "United States", "Chicago"),
    ("JP", "Japan", "Osaka"), ("BR", "Brazil", "São Paulo"), ("IN", "India", None),
]


def main():
    networks, out, addresses = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    rng = random.Random(0x5EED)
    writer = MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-City",
                        languages=["en"], description="ingest pipeline benchmark database")
    seen = set()
    with open(addresses, "w") as listed:
        while len(seen) < networks:
            prefix = (rng.randrange(1, 224), rng.randrange(256), rng.randrange(256))
            if prefix in seen:
                continue
            seen.add(prefix)
            iso, country, city = rng.choice(PLACES)
            record = {"country": {"iso_code": iso, "names": {"en": country}}}
            if city:
                record["city"] = {"names": {"en": city}}
            network = "%d.%d.%d.0/24" % prefix
            writer.insert_network(IPSet([IPNetwork(network)]), record)
            listed.write("%d.%d.%d.%d\n" % (prefix + (rng.randrange(1, 255),)))
    writer.to_db_file(out)


if __name__ == "__main__":
    main()
