//! The radio's own per-station PHY rate, as `iw dev wlan0 station dump` prints it, without ROS.
//!
//! A Linux wifi driver knows the rate its rate control uses toward each station ("tx bitrate:
//! 24.0 MBit/s"). An executor reads that text from a file (`station_dump_file`: on a drone a
//! timer writes `iw dev wlan0 station dump` there about once a second; over the emulated radio
//! the emulator writes it, docs/radio.md) and reports the rate toward the host its activations
//! go to (`Heartbeat.link_phy_bps`): the PHY rate the cost model's airtime takes, where the
//! goodput it measures itself is only a lower bound of what the link carries.
use std::collections::BTreeMap;
use std::fmt;

/// A 48-bit MAC address (`00:1a:2b:3c:4d:5e`, any case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac([u8; 6]);

impl std::str::FromStr for Mac {
    type Err = StationDumpError;

    fn from_str(s: &str) -> Result<Mac, StationDumpError> {
        let bad = || StationDumpError::BadMac(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in out.iter_mut() {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StationDumpError {
    #[error("`{0}` is not a MAC address (expected six hex pairs: 00:1a:2b:3c:4d:5e)")]
    BadMac(String),
    #[error("line {line}: `{text}` comes before any `Station <mac> (on <iface>)` line")]
    FieldOutsideStation { line: usize, text: String },
    #[error("line {line}: `{text}`: {why}")]
    BadLine { line: usize, text: String, why: String },
    #[error("station {0} is listed twice")]
    DuplicateStation(Mac),
    #[error("station_macs: `{entry}`: {why} (expected `name=mac, name=mac, ...`)")]
    BadMacMap { entry: String, why: String },
}

/// One station of a dump: what the parser keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct Station {
    pub mac: Mac,
    pub iface: String,
    /// "tx bitrate": the PHY rate toward the station, bit/s (absent: the driver does not know).
    pub tx_bitrate_bps: Option<f64>,
    /// "rx bitrate": the PHY rate of what the station last sent here, bit/s.
    pub rx_bitrate_bps: Option<f64>,
    /// "signal", dBm (the first figure: iw adds per-chain figures in brackets).
    pub signal_dbm: Option<f64>,
}

/// The fastest PHY rate a station dump may report (802.11be's top rates are below 50 Gbit/s).
pub const MAX_PHY_BPS: f64 = 1e11;

/// Parses the text of `iw dev <iface> station dump`: per station a `Station <mac> (on <iface>)`
/// line and indented `key: value` lines, of which the bitrates and the signal are kept; other
/// keys are ignored, so newer `iw` versions' fields do no harm. A rate reads as in
/// `tx bitrate:\t144.4 MBit/s MCS 15 short GI` (the number and its unit, the rest ignored); a
/// bitrate without a number (`(unknown)`) is unknown. Anything else malformed is an error that
/// names the line.
pub fn parse_station_dump(text: &str) -> Result<Vec<Station>, StationDumpError> {
    let mut stations: Vec<Station> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let bad = |why: &str| StationDumpError::BadLine { line, text: raw.to_string(), why: why.to_string() };
        if raw.trim().is_empty() {
            continue;
        }
        if let Some(rest) = raw.strip_prefix("Station ") {
            let (mac, on) = rest.trim().split_once(char::is_whitespace).unwrap_or((rest.trim(), ""));
            let mac: Mac = mac.parse().map_err(|e: StationDumpError| bad(&e.to_string()))?;
            let iface = on
                .trim()
                .strip_prefix("(on ")
                .and_then(|r| r.strip_suffix(')'))
                .filter(|r| !r.is_empty())
                .ok_or_else(|| bad("expected `Station <mac> (on <iface>)`"))?;
            if stations.iter().any(|s| s.mac == mac) {
                return Err(StationDumpError::DuplicateStation(mac));
            }
            stations.push(Station {
                mac,
                iface: iface.to_string(),
                tx_bitrate_bps: None,
                rx_bitrate_bps: None,
                signal_dbm: None,
            });
            continue;
        }
        let Some(station) = stations.last_mut() else {
            return Err(StationDumpError::FieldOutsideStation { line, text: raw.to_string() });
        };
        if !raw.starts_with(char::is_whitespace) {
            return Err(bad("expected an indented `key: value` line or a `Station` line"));
        }
        // "beacon interval:100" has no space after the colon; the key never has a colon.
        let Some((key, value)) = raw.trim().split_once(':') else {
            return Err(bad("expected `key: value`"));
        };
        let value = value.trim();
        match key.trim() {
            "tx bitrate" => station.tx_bitrate_bps = bitrate(value).map_err(|w| bad(&w))?,
            "rx bitrate" => station.rx_bitrate_bps = bitrate(value).map_err(|w| bad(&w))?,
            "signal" => {
                let first = value.split_whitespace().next().unwrap_or("");
                let dbm: f64 = first.parse().map_err(|_| bad("expected `<dBm> ... dBm`"))?;
                if !dbm.is_finite() {
                    return Err(bad("the signal is not a finite number"));
                }
                station.signal_dbm = Some(dbm);
            }
            _ => {}
        }
    }
    Ok(stations)
}

/// `54.0 MBit/s`, `6.5 MBit/s MCS 0`, `866.7 MBit/s VHT-MCS 9 80MHz short GI VHT-NSS 2` -> bit/s;
/// `(unknown)` or nothing -> None.
fn bitrate(value: &str) -> Result<Option<f64>, String> {
    let mut words = value.split_whitespace();
    let Some(number) = words.next() else { return Ok(None) };
    if number.starts_with('(') {
        return Ok(None);
    }
    let n: f64 = number.parse().map_err(|_| format!("`{number}` is not a number"))?;
    let scale = match words.next() {
        Some("MBit/s") => 1e6,
        Some("kBit/s") => 1e3,
        Some("GBit/s") => 1e9,
        Some(u) => return Err(format!("unknown rate unit `{u}` (MBit/s expected)")),
        None => return Err("a rate without its unit (MBit/s expected)".into()),
    };
    let bps = n * scale;
    if !(bps.is_finite() && (0.0..=MAX_PHY_BPS).contains(&bps)) {
        return Err(format!("{n} is not a rate (0..{} MBit/s)", MAX_PHY_BPS / 1e6));
    }
    Ok(Some(bps))
}

/// `uav1=00:00:00:00:00:02, control=00:00:00:00:00:01` (commas or whitespace between entries):
/// which radio each host of the swarm has. Empty: none known.
pub fn parse_mac_map(text: &str) -> Result<BTreeMap<String, Mac>, StationDumpError> {
    let mut map = BTreeMap::new();
    for entry in text.split(|c: char| c == ',' || c.is_whitespace()).filter(|e| !e.is_empty()) {
        let bad = |why: &str| StationDumpError::BadMacMap { entry: entry.to_string(), why: why.to_string() };
        let (name, mac) = entry.split_once('=').ok_or_else(|| bad("no `=`"))?;
        if name.is_empty() {
            return Err(bad("no host name"));
        }
        let mac: Mac = mac.parse().map_err(|e: StationDumpError| bad(&e.to_string()))?;
        if map.insert(name.to_string(), mac).is_some() {
            return Err(bad("the host is named twice"));
        }
    }
    Ok(map)
}

/// The host a stage's activations go to: its ring successor `succ` when the stage ends before
/// the model's last layer (`end` < `num_layers`: a stage around the gateway ends past it), else
/// the gateway on `gateway_host` (the last stage's output is the gateway's input).
pub fn next_hop(end: usize, num_layers: usize, succ: Option<&str>, gateway_host: &str) -> String {
    match succ {
        Some(s) if end < num_layers => s.to_string(),
        _ => gateway_host.to_string(),
    }
}

/// The PHY rate (bit/s) an executor reports: toward `next_hop` (the host its activations go to)
/// when `macs` names its radio and the dump knows the rate toward it, else the median of every
/// station's (the upper one of an even count); 0 when no station has a known rate.
pub fn phy_rate_bps(stations: &[Station], macs: &BTreeMap<String, Mac>, next_hop: Option<&str>) -> f64 {
    let toward = next_hop
        .and_then(|h| macs.get(h))
        .and_then(|mac| stations.iter().find(|s| s.mac == *mac))
        .and_then(|s| s.tx_bitrate_bps)
        .filter(|r| *r > 0.0);
    if let Some(r) = toward {
        return r;
    }
    let mut rates: Vec<f64> = stations.iter().filter_map(|s| s.tx_bitrate_bps).filter(|r| *r > 0.0).collect();
    rates.sort_by(f64::total_cmp);
    rates.get(rates.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `iw dev wlp3s0 station dump` on a laptop (iw 5.19, 802.11n), trimmed of nothing.
    const IW_HT: &str = "Station 3c:84:6a:01:02:03 (on wlp3s0)
\tinactive time:\t1032 ms
\trx bytes:\t45623112
\trx packets:\t52311
\ttx bytes:\t3822921
\ttx packets:\t21440
\ttx retries:\t1562
\ttx failed:\t3
\tbeacon loss:\t0
\tbeacon rx:\t13442
\trx drop misc:\t27
\tsignal:  \t-52 [-54, -56] dBm
\tsignal avg:\t-51 [-53, -55] dBm
\tbeacon signal avg:\t-50 dBm
\ttx bitrate:\t144.4 MBit/s MCS 15 short GI
\ttx duration:\t98341 us
\trx bitrate:\t130.0 MBit/s MCS 15
\trx duration:\t0 us
\texpected throughput:\t62.500Mbps
\tauthorized:\tyes
\tauthenticated:\tyes
\tassociated:\tyes
\tpreamble:\tlong
\tWMM/WME:\tyes
\tMFP:\t\tno
\tTDLS peer:\tno
\tDTIM period:\t1
\tbeacon interval:100
\tshort slot time:yes
\tconnected time:\t1342 seconds
\tassociated at [boottime]:\t8821.315s
\tassociated at:\t1733561212671 ms
\tcurrent time:\t1733562554321 ms
";

    /// An IBSS (ad-hoc) node with two peers, 802.11a; the second has sent nothing yet.
    const IW_ADHOC: &str = "Station 00:00:00:00:00:02 (on wlan0)
\tinactive time:\t12 ms
\trx bytes:\t181220
\trx packets:\t402
\ttx bytes:\t2944122
\ttx packets:\t2103
\ttx retries:\t31
\ttx failed:\t0
\tsignal:  \t-61 dBm
\ttx bitrate:\t54.0 MBit/s
\trx bitrate:\t48.0 MBit/s
\tauthorized:\tyes
Station 00:00:00:00:00:04 (on wlan0)
\tinactive time:\t4012 ms
\ttx bitrate:\t(unknown)
Station 00:00:00:00:00:03 (on wlan0)
\tsignal:  \t-77 dBm
\ttx bitrate:\t24.0 MBit/s
";

    #[test]
    fn real_iw_output_gives_each_stations_rates() {
        let s = parse_station_dump(IW_HT).expect("parses");
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].mac.to_string(), "3c:84:6a:01:02:03");
        assert_eq!(s[0].iface, "wlp3s0");
        assert_eq!(s[0].tx_bitrate_bps, Some(144.4e6));
        assert_eq!(s[0].rx_bitrate_bps, Some(130e6));
        assert_eq!(s[0].signal_dbm, Some(-52.0));
        let a = parse_station_dump(IW_ADHOC).expect("parses");
        let rates: Vec<_> = a.iter().map(|s| s.tx_bitrate_bps).collect();
        assert_eq!(rates, vec![Some(54e6), None, Some(24e6)]);
        assert_eq!(parse_station_dump("").expect("empty"), vec![]);
        let vht =
            "Station aa:bb:cc:dd:ee:ff (on wlan0)\n\ttx bitrate:\t866.7 MBit/s VHT-MCS 9 80MHz short GI VHT-NSS 2\n";
        assert_eq!(parse_station_dump(vht).expect("vht")[0].tx_bitrate_bps, Some(866.7e6));
    }

    #[test]
    fn malformed_dumps_are_errors_that_name_the_line() {
        let cases = [
            ("\ttx bitrate:\t54.0 MBit/s\n", "before any `Station"),
            ("Station 00:00:00:00:00:0g (on wlan0)\n", "not a MAC"),
            ("Station 00:00:00:00:00 (on wlan0)\n", "not a MAC"),
            ("Station 00:00:00:00:00:02\n", "expected `Station"),
            ("Station 00:00:00:00:00:02 (on wlan0)\n\ttx bitrate:\t5x.0 MBit/s\n", "not a number"),
            ("Station 00:00:00:00:00:02 (on wlan0)\n\ttx bitrate:\t54.0 furlongs\n", "unknown rate unit"),
            ("Station 00:00:00:00:00:02 (on wlan0)\n\ttx bitrate:\t54.0\n", "without its unit"),
            ("Station 00:00:00:00:00:02 (on wlan0)\n\ttx bitrate:\t-5 MBit/s\n", "not a rate"),
            ("Station 00:00:00:00:00:02 (on wlan0)\n\ttx bitrate:\tinf MBit/s\n", "not a rate"),
            ("Station 00:00:00:00:00:02 (on wlan0)\n\tsignal:\tloud\n", "dBm"),
            ("Station 00:00:00:00:00:02 (on wlan0)\nrx bytes: 3\n", "indented"),
            ("Station 00:00:00:00:00:02 (on wlan0)\n\tno colon here\n", "key: value"),
        ];
        for (text, why) in cases {
            let e = parse_station_dump(text).expect_err(text).to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
        let twice = "Station 00:00:00:00:00:02 (on wlan0)\nStation 00:00:00:00:00:02 (on wlan0)\n";
        assert!(matches!(parse_station_dump(twice), Err(StationDumpError::DuplicateStation(_))));
        // Arbitrary bytes never panic.
        for text in
            ["Station ", "Station  (on )", "\u{0}\u{fffd}:", "Station 00:00:00:00:00:02 (on wlan0)\n\t:\n", "\t"]
        {
            let _ = parse_station_dump(text);
        }
    }

    #[test]
    fn the_rate_toward_the_next_hop_else_the_median() {
        let stations = parse_station_dump(IW_ADHOC).expect("parses");
        let macs =
            parse_mac_map("control=00:00:00:00:00:01, uav1=00:00:00:00:00:02 uav2=00:00:00:00:00:03").expect("map");
        assert_eq!(phy_rate_bps(&stations, &macs, Some("uav2")), 24e6);
        assert_eq!(phy_rate_bps(&stations, &macs, Some("uav1")), 54e6);
        // Not in the dump, not mapped, or no map: the median of the known rates (24 and 54: the upper).
        assert_eq!(phy_rate_bps(&stations, &macs, Some("control")), 54e6);
        assert_eq!(phy_rate_bps(&stations, &macs, Some("uav9")), 54e6);
        assert_eq!(phy_rate_bps(&stations, &BTreeMap::new(), None), 54e6);
        assert_eq!(phy_rate_bps(&[], &macs, Some("uav1")), 0.0);
        let unknown =
            parse_station_dump("Station 00:00:00:00:00:04 (on wlan0)\n\ttx bitrate:\t(unknown)\n").expect("ok");
        assert_eq!(phy_rate_bps(&unknown, &macs, None), 0.0);
    }

    #[test]
    fn a_stage_sends_to_its_successor_the_last_stage_to_the_gateway() {
        assert_eq!(next_hop(10, 30, Some("uav2"), "control"), "uav2");
        assert_eq!(next_hop(30, 30, Some("uav1"), "control"), "control");
        // Around the gateway (layers 25..35 of 30), and a UAV alone in the plan.
        assert_eq!(next_hop(35, 30, Some("uav1"), "control"), "control");
        assert_eq!(next_hop(10, 30, None, "control"), "control");
    }

    #[test]
    fn mac_maps_parse_or_say_what_is_wrong() {
        assert!(parse_mac_map("").expect("empty").is_empty());
        let m = parse_mac_map(" uav1=AA:bb:cc:dd:ee:01,,uav2=aa:bb:cc:dd:ee:02 ").expect("map");
        assert_eq!(m["uav1"].to_string(), "aa:bb:cc:dd:ee:01");
        assert_eq!(m.len(), 2);
        for bad in ["uav1", "=aa:bb:cc:dd:ee:01", "uav1=aa:bb", "uav1=aa:bb:cc:dd:ee:01 uav1=aa:bb:cc:dd:ee:02"] {
            assert!(matches!(parse_mac_map(bad), Err(StationDumpError::BadMacMap { .. })), "{bad}");
        }
    }
}
