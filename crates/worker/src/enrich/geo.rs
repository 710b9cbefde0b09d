//! The country (and the city, where the database has cities) of a client's address, from an
//! offline MaxMind-format database (`.mmdb`): MaxMind's GeoLite2 and GeoIP2 Country and City,
//! and DB-IP's lite files, which share the layout. The file is read into memory once, at start;
//! a lookup is a walk of its search tree, with no I/O.

use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;

/// Names longer than this (in bytes) are cut.
pub const MAX_NAME_BYTES: usize = 48;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geo {
    /// ISO 3166-1 alpha-2.
    pub country: Option<String>,
    /// In English.
    pub country_name: Option<String>,
    pub city: Option<String>,
}

/// Only what is kept is decoded.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<Place<'a>>,
    #[serde(borrow, default)]
    city: Option<Place<'a>>,
}

#[derive(Deserialize)]
struct Place<'a> {
    #[serde(default)]
    iso_code: Option<&'a str>,
    #[serde(borrow, default)]
    names: Option<Names<'a>>,
}

#[derive(Deserialize)]
struct Names<'a> {
    #[serde(default)]
    en: Option<&'a str>,
}

pub struct GeoReader {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl GeoReader {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|error| {
            anyhow::anyhow!(
                "enrich.geo_database: cannot read {} as a MaxMind-format database: {error}",
                path.display()
            )
        })?;
        tracing::info!(path = %path.display(), kind = %reader.metadata().database_type, built = reader.metadata().build_epoch, "geolocation database loaded");
        Ok(Self { reader })
    }

    /// `None` when the address is not in the database (or its record has neither a country
    /// nor a city).
    pub fn locate(&self, ip: IpAddr) -> Option<Geo> {
        let found = self.reader.lookup(ip).ok()?;
        let record: Record<'_> = found.decode().ok()??;
        let name = |place: &Option<Place<'_>>| {
            place
                .as_ref()
                .and_then(|p| p.names.as_ref())
                .and_then(|n| n.en)
                .map(|n| super::agent::plain(n, MAX_NAME_BYTES))
        };
        let geo = Geo {
            country: record
                .country
                .as_ref()
                .and_then(|c| c.iso_code)
                .map(|c| super::agent::plain(c, 2)),
            country_name: name(&record.country),
            city: name(&record.city),
        };
        (geo.country.is_some() || geo.city.is_some()).then_some(geo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Built by `tests/fixtures/make-geo-db.py` (see there for what it holds).
    pub(crate) fn test_database() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/geo-test.mmdb")
    }

    #[test]
    fn a_known_address_has_its_country_and_city_and_an_unknown_one_none() {
        let geo = GeoReader::open(&test_database()).expect("the test database");
        let berlin = geo
            .locate("203.0.113.9".parse().expect("ip"))
            .expect("found");
        assert_eq!(berlin.country.as_deref(), Some("DE"));
        assert_eq!(berlin.country_name.as_deref(), Some("Germany"));
        assert_eq!(berlin.city.as_deref(), Some("Berlin"));
        let v6 = geo
            .locate("2001:db8:1::7".parse().expect("ip"))
            .expect("found");
        assert_eq!(v6.country.as_deref(), Some("JP"));
        assert_eq!(v6.city, None);
        assert_eq!(geo.locate("192.0.2.1".parse().expect("ip")), None);
    }

    #[test]
    fn a_file_that_is_not_a_database_is_a_clear_error() {
        let error = GeoReader::open(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("Cargo.toml")
                .as_path(),
        )
        .err()
        .expect("refused");
        assert!(error.to_string().contains("MaxMind-format"), "{error}");
    }
}
