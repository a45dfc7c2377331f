// aerokv_radio: the emulated 802.11 ad-hoc radio that joins AeroKV's hosts (each a Linux network
// namespace) in real time. `aerokv swarm --radio SCENARIO` writes this program's input from the
// scenario (see src/radio/scenario.rs) and starts it in a namespace of its own that holds one tap
// device per host; each tap is bridged to that host's eth0.
//
// Input (one item per line, written by aerokv; '#' starts a comment):
//   standard 80211a|80211b|80211g|80211n_2_4ghz|80211n_5ghz
//   manager ns3::MinstrelWifiManager     rate control (ns-3 WifiRemoteStationManager type)
//   data_mode OfdmRate24Mbps|-           fixed rate for ns3::ConstantRateWifiManager
//   tx_power_dbm 16
//   propagation log_distance EXPONENT REFERENCE_LOSS_DB | friis
//   max_range_m M                        0: no hard range limit
//   frame_error_rate P                   each received frame is lost with probability P
//   queue_packets N                      wifi MAC queue size (per access category)
//   voice_max_bytes N                    IPv4 datagrams of at most N bytes that are not IP fragments
//                                        go in 802.11e's voice access category (heartbeats, DDS
//                                        acknowledgements, control messages, single tokens), the
//                                        rest best effort (bulk data: fragments); 0: no 802.11e
//   report_period_s S
//   station_dump_dir DIR                 optional: every report period, per node, DIR/NAME.txt in
//                                        the text format of `iw dev wlan0 station dump` (one
//                                        "Station MAC (on eth0)" block per peer: packets, bytes,
//                                        signal, and "tx bitrate"/"rx bitrate", the PHY rate the
//                                        rate control chose most often for first attempts of
//                                        unicast data frames in the period, the last one if none);
//                                        written to DIR/NAME.txt.tmp, then renamed
//   node INDEX NAME TAP MAC              one per host, INDEX 0, 1, ...
//   waypoint INDEX T X Y Z               seconds after the mission clock starts, metres
//
// Before the mission clock starts every node stands at its first waypoint. The clock starts when
// the line "go" arrives on stdin (aerokv sends it with the request); end of stdin stops the program.
#include "ns3/core-module.h"
#include "ns3/mobility-module.h"
#include "ns3/network-module.h"
#include "ns3/tap-bridge-module.h"
#include "ns3/wifi-module.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <csignal>
#include <fstream>
#include <iostream>
#include <map>
#include <poll.h>
#include <sstream>
#include <unistd.h>

using namespace ns3;

namespace
{

struct NodeSpec
{
    std::string name;
    std::string tap;
    std::string mac;
    std::vector<std::pair<double, Vector>> waypoints;
};

struct Config
{
    std::string standard = "80211a";
    std::string manager = "ns3::MinstrelWifiManager";
    std::string dataMode = "-";
    double txPowerDbm = 16.0;
    std::string propagation = "log_distance";
    double exponent = 3.0;
    double referenceLossDb = 46.6777;
    double maxRangeM = 0.0;
    double frameErrorRate = 0.0;
    uint32_t queuePackets = 500;
    uint32_t voiceMaxBytes = 1000;
    double reportPeriodS = 1.0;
    std::string stationDumpDir;
    std::vector<NodeSpec> nodes;
};

[[noreturn]] void
Fail(const std::string& why)
{
    std::cerr << "aerokv_radio: " << why << std::endl;
    std::exit(2);
}

Config
ReadConfig(const std::string& path)
{
    std::ifstream in(path);
    if (!in)
    {
        Fail("cannot read " + path);
    }
    Config c;
    std::string line;
    int lineNo = 0;
    while (std::getline(in, line))
    {
        ++lineNo;
        auto hash = line.find('#');
        if (hash != std::string::npos)
        {
            line.resize(hash);
        }
        std::istringstream s(line);
        std::string key;
        if (!(s >> key))
        {
            continue;
        }
        bool ok = true;
        if (key == "standard")
        {
            ok = bool(s >> c.standard);
        }
        else if (key == "manager")
        {
            ok = bool(s >> c.manager);
        }
        else if (key == "data_mode")
        {
            ok = bool(s >> c.dataMode);
        }
        else if (key == "tx_power_dbm")
        {
            ok = bool(s >> c.txPowerDbm);
        }
        else if (key == "propagation")
        {
            ok = bool(s >> c.propagation);
            if (ok && c.propagation == "log_distance")
            {
                ok = bool(s >> c.exponent >> c.referenceLossDb);
            }
        }
        else if (key == "max_range_m")
        {
            ok = bool(s >> c.maxRangeM);
        }
        else if (key == "frame_error_rate")
        {
            ok = bool(s >> c.frameErrorRate);
        }
        else if (key == "queue_packets")
        {
            ok = bool(s >> c.queuePackets);
        }
        else if (key == "voice_max_bytes")
        {
            ok = bool(s >> c.voiceMaxBytes);
        }
        else if (key == "report_period_s")
        {
            ok = bool(s >> c.reportPeriodS) && c.reportPeriodS > 0;
        }
        else if (key == "station_dump_dir")
        {
            // The rest of the line: a path may hold spaces.
            ok = bool(std::getline(s >> std::ws, c.stationDumpDir)) && !c.stationDumpDir.empty();
        }
        else if (key == "node")
        {
            size_t index;
            NodeSpec n;
            ok = bool(s >> index >> n.name >> n.tap >> n.mac) && index == c.nodes.size();
            c.nodes.push_back(n);
        }
        else if (key == "waypoint")
        {
            size_t index;
            double t;
            Vector p;
            ok = bool(s >> index >> t >> p.x >> p.y >> p.z) && index < c.nodes.size();
            if (ok)
            {
                auto& w = c.nodes[index].waypoints;
                ok = w.empty() || t > w.back().first;
                w.emplace_back(t, p);
            }
        }
        else
        {
            ok = false;
        }
        if (!ok)
        {
            Fail(path + ":" + std::to_string(lineNo) + ": cannot use `" + line + "`");
        }
    }
    if (c.nodes.size() < 2)
    {
        Fail("at least two nodes are needed");
    }
    for (const auto& n : c.nodes)
    {
        if (n.waypoints.empty())
        {
            Fail("node " + n.name + " has no position");
        }
    }
    return c;
}

WifiStandard
Standard(const std::string& name, std::string& channel)
{
    if (name == "80211a")
    {
        return WIFI_STANDARD_80211a;
    }
    if (name == "80211b")
    {
        return WIFI_STANDARD_80211b;
    }
    if (name == "80211g")
    {
        return WIFI_STANDARD_80211g;
    }
    if (name == "80211n_2_4ghz")
    {
        channel = "{0, 20, BAND_2_4GHZ, 0}";
        return WIFI_STANDARD_80211n;
    }
    if (name == "80211n_5ghz")
    {
        channel = "{0, 20, BAND_5GHZ, 0}";
        return WIFI_STANDARD_80211n;
    }
    Fail("unknown standard " + name);
}

Config gConfig;
NodeContainer gNodes;
std::chrono::steady_clock::time_point gWall0;
double gMaxLagMs = 0;
volatile std::sig_atomic_t gStop = 0;
// In ns-3.37 a full WifiMacQueue drops without a drop trace: queue-full drops are the frames
// handed to the MAC minus the frames it enqueued.
uint64_t gMacTx = 0;
uint64_t gEnqueued = 0;
uint64_t gMacRx = 0;
uint64_t gRetryDrops = 0;
uint64_t gExpiredDrops = 0;
uint64_t gPhyRxDrops = 0;
uint64_t gVoice = 0;

// 802.11e (WMM): a host's IP stack would mark its heartbeat socket (DSCP) and the wifi driver
// map that to an access category; Fast DDS cannot mark one writer's datagrams, so the emulator
// classifies by shape instead. Bulk data (prompt chunks, KV rows, replays, full-precision
// activations) leaves Fast DDS as datagrams larger than the MTU, hence IP fragments; control
// traffic is single small datagrams. A size limit alone is not enough: AeroKV's heartbeat grows
// by 32 bytes per request an executor holds (384 bytes with none, 416 with one), and when it
// outgrew a 400-byte limit it queued behind the fragments for a UAV out of range, whose every
// frame is retried, until the MAC's 500 ms lifetime dropped it. MacTx fires in
// WifiNetDevice::Send after the LLC header is added and before the MAC queues the packet by its
// SocketPriorityTag (ns-3: tags may be added to a const packet). Priority 6 = TID 6 = AC_VO.
bool
IsVoice(Ptr<const Packet> p)
{
    // LLC/SNAP (8 bytes, its EtherType last), then the IPv4 header; read in place, not copied.
    const uint32_t llc = 8;
    uint8_t head[llc + 8];
    if (p->GetSize() > llc + gConfig.voiceMaxBytes || p->CopyData(head, sizeof head) != sizeof head ||
        (head[6] << 8 | head[7]) != 0x0800)
    {
        return false;
    }
    // Flags and fragment offset (RFC 791): more fragments (0x2000) or an offset means a fragment.
    return ((head[llc + 6] << 8 | head[llc + 7]) & 0x3fff) == 0;
}

void
ClassifyAccessCategory(Ptr<const Packet> p)
{
    ++gMacTx;
    if (gConfig.voiceMaxBytes > 0 && IsVoice(p))
    {
        SocketPriorityTag tag;
        tag.SetPriority(6);
        p->AddPacketTag(tag);
        ++gVoice;
    }
}

// What a node's radio knows of each peer, as a Linux driver keeps it for `iw station dump`.
struct PeerStats
{
    uint64_t txBytes = 0;
    uint64_t txPackets = 0;
    uint64_t txRetries = 0;
    uint64_t txFailed = 0;
    // Frames that waited in the queue past the MAC's lifetime (ns-3: 500 ms) and were dropped.
    uint64_t txExpired = 0;
    uint64_t rxBytes = 0;
    uint64_t rxPackets = 0;
    // This period: PHY rate (bit/s) -> (first attempts of unicast data frames, iw's text of it).
    std::map<uint64_t, std::pair<uint64_t, std::string>> txRates;
    std::map<uint64_t, std::pair<uint64_t, std::string>> rxRates;
    std::string txRate;
    std::string rxRate;
    double signalDbm = 0;
    bool heard = false;
    Time last;
};

// Per node, per peer node index.
std::vector<std::map<uint32_t, PeerStats>> gPeers;
std::map<Mac48Address, uint32_t> gNodeOfMac;

// iw's rate text: "54.0 MBit/s", "65.0 MBit/s MCS 7 short GI".
std::string
RateText(const WifiTxVector& v)
{
    uint64_t bps = v.GetMode().GetDataRate(v);
    std::ostringstream o;
    o << bps / 1000000 << "." << (bps / 100000) % 10 << " MBit/s";
    if (v.GetMode().GetModulationClass() == WIFI_MOD_CLASS_HT)
    {
        o << " MCS " << int(v.GetMode().GetMcsValue());
        if (v.GetGuardInterval() == 400)
        {
            o << " short GI";
        }
    }
    return o.str();
}

// The MAC header of a sniffed MPDU (an A-MPDU's subframes carry their subframe header first).
bool
MacHeaderOf(Ptr<const Packet> p, const MpduInfo& info, WifiMacHeader& hdr)
{
    Ptr<Packet> c = p->Copy();
    if (info.type != NORMAL_MPDU)
    {
        AmpduSubframeHeader sub;
        c->RemoveHeader(sub);
    }
    return c->GetSize() >= 24 && c->PeekHeader(hdr) > 0;
}

// One more frame sent (or heard) at `v`'s rate: counted per rate, with its `iw` text.
void
CountRate(std::map<uint64_t, std::pair<uint64_t, std::string>>& rates, const WifiTxVector& v)
{
    auto& r = rates[v.GetMode().GetDataRate(v)];
    if (r.first++ == 0)
    {
        r.second = RateText(v);
    }
}

void
OnSnifferTx(uint32_t node, Ptr<const Packet> p, uint16_t, WifiTxVector v, MpduInfo info, uint16_t)
{
    WifiMacHeader hdr;
    if (!MacHeaderOf(p, info, hdr) || !hdr.IsData() || hdr.GetAddr1().IsGroup())
    {
        return;
    }
    auto peer = gNodeOfMac.find(hdr.GetAddr1());
    if (peer == gNodeOfMac.end())
    {
        return;
    }
    PeerStats& s = gPeers[node][peer->second];
    s.last = Simulator::Now();
    if (hdr.IsRetry())
    {
        ++s.txRetries;
        return;
    }
    ++s.txPackets;
    s.txBytes += p->GetSize();
    CountRate(s.txRates, v);
}

void
OnSnifferRx(uint32_t node,
            Ptr<const Packet> p,
            uint16_t,
            WifiTxVector v,
            MpduInfo info,
            SignalNoiseDbm sn,
            uint16_t)
{
    WifiMacHeader hdr;
    if (!MacHeaderOf(p, info, hdr) || !hdr.IsData())
    {
        return;
    }
    auto self = gNodeOfMac.find(hdr.GetAddr1());
    auto peer = gNodeOfMac.find(hdr.GetAddr2());
    if (self == gNodeOfMac.end() || self->second != node || peer == gNodeOfMac.end())
    {
        return;
    }
    PeerStats& s = gPeers[node][peer->second];
    s.last = Simulator::Now();
    s.heard = true;
    s.signalDbm = sn.signal;
    ++s.rxPackets;
    s.rxBytes += p->GetSize();
    CountRate(s.rxRates, v);
}

void
OnDroppedMpdu(uint32_t node, WifiMacDropReason reason, Ptr<const WifiMpdu> mpdu)
{
    gRetryDrops += reason == WIFI_MAC_DROP_REACHED_RETRY_LIMIT;
    gExpiredDrops += reason == WIFI_MAC_DROP_EXPIRED_LIFETIME;
    auto peer = gNodeOfMac.find(mpdu->GetHeader().GetAddr1());
    if (peer == gNodeOfMac.end())
    {
        return;
    }
    auto& s = gPeers[node][peer->second];
    s.txFailed += reason == WIFI_MAC_DROP_REACHED_RETRY_LIMIT;
    s.txExpired += reason == WIFI_MAC_DROP_EXPIRED_LIFETIME;
}

// The rate chosen most often this period; the last one when the period saw none.
void
Settle(std::map<uint64_t, std::pair<uint64_t, std::string>>& rates, std::string& chosen)
{
    uint64_t most = 0;
    for (const auto& [bps, r] : rates)
    {
        if (r.first > most)
        {
            most = r.first;
            chosen = r.second;
        }
    }
    rates.clear();
}

// Every node's `iw dev eth0 station dump`, written atomically (temp file, rename) so that a
// reader never sees half a file.
void
WriteStationDumps()
{
    for (uint32_t i = 0; i < gPeers.size(); ++i)
    {
        std::ostringstream o;
        for (auto& [j, s] : gPeers[i])
        {
            Settle(s.txRates, s.txRate);
            Settle(s.rxRates, s.rxRate);
            o << "Station " << gConfig.nodes[j].mac << " (on eth0)\n"
              << "\tinactive time:\t" << (Simulator::Now() - s.last).GetMilliSeconds() << " ms\n"
              << "\trx bytes:\t" << s.rxBytes << "\n"
              << "\trx packets:\t" << s.rxPackets << "\n"
              << "\ttx bytes:\t" << s.txBytes << "\n"
              << "\ttx packets:\t" << s.txPackets << "\n"
              << "\ttx retries:\t" << s.txRetries << "\n"
              << "\ttx failed:\t" << s.txFailed << "\n";
            if (s.heard)
            {
                o << "\tsignal:  \t" << std::lround(s.signalDbm) << " dBm\n";
            }
            if (!s.txRate.empty())
            {
                o << "\ttx bitrate:\t" << s.txRate << "\n";
            }
            if (!s.rxRate.empty())
            {
                o << "\trx bitrate:\t" << s.rxRate << "\n";
            }
            o << "\tauthorized:\tyes\n\tauthenticated:\tyes\n\tassociated:\tyes\n\tWMM/WME:\tyes\n";
        }
        std::string path = gConfig.stationDumpDir + "/" + gConfig.nodes[i].name + ".txt";
        {
            std::ofstream f(path + ".tmp", std::ios::trunc);
            f << o.str();
            if (!f)
            {
                std::cerr << "aerokv_radio: cannot write " << path << ".tmp" << std::endl;
                continue;
            }
        }
        if (std::rename((path + ".tmp").c_str(), path.c_str()) != 0)
        {
            std::cerr << "aerokv_radio: cannot rename " << path << ".tmp" << std::endl;
        }
    }
}

double
LagMs()
{
    double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - gWall0).count();
    return (wall - Simulator::Now().GetSeconds()) * 1e3;
}

void
Report(const char* what)
{
    std::cout << what << " t=" << Simulator::Now().GetSeconds() << " lag_ms=" << LagMs()
              << " max_lag_ms=" << gMaxLagMs << " frames_in=" << gMacTx << " delivered=" << gMacRx
              << " queue_full_drops=" << gMacTx - gEnqueued << " retry_limit_drops=" << gRetryDrops
              << " expired_drops=" << gExpiredDrops
              << " phy_rx_drops=" << gPhyRxDrops << " voice_frames=" << gVoice << std::endl;
}

// Real-time health: how late (wall clock) an event scheduled for sim time T runs.
void
LagProbe()
{
    gMaxLagMs = std::max(gMaxLagMs, LagMs());
    Simulator::Schedule(MilliSeconds(100), &LagProbe);
}

void
PeriodicReport()
{
    Report("stats");
    if (!gConfig.stationDumpDir.empty())
    {
        WriteStationDumps();
    }
    Simulator::Schedule(Seconds(gConfig.reportPeriodS), &PeriodicReport);
}

void
StartMissionClock()
{
    Time t0 = Simulator::Now();
    for (uint32_t i = 0; i < gNodes.GetN(); ++i)
    {
        auto m = gNodes.Get(i)->GetObject<WaypointMobilityModel>();
        for (const auto& [t, p] : gConfig.nodes[i].waypoints)
        {
            m->AddWaypoint(Waypoint(t0 + Seconds(t), p));
        }
    }
    std::cout << "mission clock started t=" << t0.GetSeconds() << std::endl;
}

// Commands on stdin ("go"), end of stdin and SIGTERM, every 50 ms.
void
PollControl()
{
    struct pollfd p = {STDIN_FILENO, POLLIN, 0};
    while (!gStop && poll(&p, 1, 0) > 0)
    {
        char buf[256];
        ssize_t n = read(STDIN_FILENO, buf, sizeof buf);
        if (n <= 0)
        {
            gStop = 1;
            break;
        }
        if (std::string(buf, n).find("go") != std::string::npos)
        {
            StartMissionClock();
        }
    }
    if (gStop)
    {
        Simulator::Stop();
        return;
    }
    Simulator::Schedule(MilliSeconds(50), &PollControl);
}

void
OnCourseChange(std::string name, Ptr<const MobilityModel> m)
{
    Vector p = m->GetPosition();
    Vector v = m->GetVelocity();
    std::cout << "course t=" << Simulator::Now().GetSeconds() << " node=" << name << " position=("
              << p.x << "," << p.y << "," << p.z << ") velocity=(" << v.x << "," << v.y << "," << v.z
              << ")" << std::endl;
}

} // namespace

int
main(int argc, char* argv[])
{
    std::string input;
    CommandLine cmd(__FILE__);
    cmd.AddValue("input", "the network description aerokv wrote", input);
    cmd.Parse(argc, argv);
    if (input.empty())
    {
        Fail("--input is required");
    }
    gConfig = ReadConfig(input);
    std::signal(SIGTERM, [](int) { gStop = 1; });
    std::signal(SIGINT, [](int) { gStop = 1; });

    GlobalValue::Bind("SimulatorImplementationType", StringValue("ns3::RealtimeSimulatorImpl"));
    GlobalValue::Bind("ChecksumEnabled", BooleanValue(true));
    Config::SetDefault("ns3::WifiMacQueue::MaxSize",
                       QueueSizeValue(QueueSize(std::to_string(gConfig.queuePackets) + "p")));

    const uint32_t n = gConfig.nodes.size();
    gNodes.Create(n);

    std::string channelSettings;
    WifiHelper wifi;
    wifi.SetStandard(Standard(gConfig.standard, channelSettings));
    if (gConfig.manager == "ns3::ConstantRateWifiManager")
    {
        wifi.SetRemoteStationManager(gConfig.manager,
                                     "DataMode",
                                     StringValue(gConfig.dataMode),
                                     "ControlMode",
                                     StringValue(gConfig.dataMode));
    }
    else
    {
        wifi.SetRemoteStationManager(gConfig.manager);
    }
    WifiMacHelper mac;
    mac.SetType("ns3::AdhocWifiMac", "QosSupported", BooleanValue(gConfig.voiceMaxBytes > 0));

    YansWifiChannelHelper channel;
    channel.SetPropagationDelay("ns3::ConstantSpeedPropagationDelayModel");
    if (gConfig.propagation == "log_distance")
    {
        channel.AddPropagationLoss("ns3::LogDistancePropagationLossModel",
                                   "Exponent",
                                   DoubleValue(gConfig.exponent),
                                   "ReferenceLoss",
                                   DoubleValue(gConfig.referenceLossDb));
    }
    else if (gConfig.propagation == "friis")
    {
        channel.AddPropagationLoss("ns3::FriisPropagationLossModel");
    }
    else
    {
        Fail("unknown propagation model " + gConfig.propagation);
    }
    if (gConfig.maxRangeM > 0)
    {
        channel.AddPropagationLoss("ns3::RangePropagationLossModel",
                                   "MaxRange",
                                   DoubleValue(gConfig.maxRangeM));
    }
    YansWifiPhyHelper phy;
    phy.SetChannel(channel.Create());
    phy.Set("TxPowerStart", DoubleValue(gConfig.txPowerDbm));
    phy.Set("TxPowerEnd", DoubleValue(gConfig.txPowerDbm));
    if (!channelSettings.empty())
    {
        phy.Set("ChannelSettings", StringValue(channelSettings));
    }
    NetDeviceContainer devs = wifi.Install(phy, mac, gNodes);

    MobilityHelper mobility;
    mobility.SetMobilityModel("ns3::WaypointMobilityModel");
    mobility.Install(gNodes);
    for (uint32_t i = 0; i < n; ++i)
    {
        const auto& spec = gConfig.nodes[i];
        gNodes.Get(i)->GetObject<MobilityModel>()->SetPosition(spec.waypoints.front().second);
        gNodes.Get(i)->GetObject<MobilityModel>()->TraceConnectWithoutContext(
            "CourseChange",
            MakeBoundCallback(&OnCourseChange, spec.name));
    }

    if (gConfig.frameErrorRate > 0)
    {
        for (uint32_t i = 0; i < n; ++i)
        {
            auto em = CreateObject<RateErrorModel>();
            em->SetAttribute("ErrorUnit", EnumValue(RateErrorModel::ERROR_UNIT_PACKET));
            em->SetAttribute("ErrorRate", DoubleValue(gConfig.frameErrorRate));
            DynamicCast<WifiNetDevice>(devs.Get(i))->GetPhy()->SetPostReceptionErrorModel(em);
        }
    }

    TapBridgeHelper tapBridge;
    tapBridge.SetAttribute("Mode", StringValue("UseLocal"));
    for (uint32_t i = 0; i < n; ++i)
    {
        const auto& spec = gConfig.nodes[i];
        // ns-3.37: in UseLocal mode TapBridge gives the wifi device the Linux MAC, but the MAC's
        // acknowledgement logic keeps the one it was built with, so unicast frames would go
        // unacknowledged. The host's eth0 carries this device's MAC instead: check they agree.
        std::ostringstream mac;
        mac << Mac48Address::ConvertFrom(devs.Get(i)->GetAddress());
        if (mac.str() != spec.mac)
        {
            Fail("node " + spec.name + " got MAC " + mac.str() + ", its host has " + spec.mac);
        }
        tapBridge.SetAttribute("DeviceName", StringValue(spec.tap));
        tapBridge.Install(gNodes.Get(i), devs.Get(i));
        std::cout << "node " << i << " " << spec.name << " tap=" << spec.tap << " mac=" << spec.mac
                  << std::endl;
    }

    const std::string dev = "/NodeList/*/DeviceList/*/$ns3::WifiNetDevice/";
    Config::ConnectWithoutContext(dev + "Mac/MacTx", MakeCallback(&ClassifyAccessCategory));
    Config::ConnectWithoutContext(dev + "Mac/MacRx",
                                  MakeCallback(+[](Ptr<const Packet>) { ++gMacRx; }));
    // One queue per access category with 802.11e, the DCF's one without.
    for (const char* txop : {"Txop", "VO_Txop", "VI_Txop", "BE_Txop", "BK_Txop"})
    {
        Config::ConnectWithoutContextFailSafe(dev + "Mac/" + txop + "/Queue/Enqueue",
                                              MakeCallback(+[](Ptr<const WifiMpdu>) { ++gEnqueued; }));
    }
    Config::ConnectWithoutContext(
        dev + "Phy/PhyRxDrop",
        MakeCallback(+[](Ptr<const Packet>, WifiPhyRxfailureReason) { ++gPhyRxDrops; }));
    // Per node and peer: what `iw station dump` shows (the PHY rate the rate control chose), and
    // the drops of every radio.
    gPeers.resize(n);
    for (uint32_t i = 0; i < n; ++i)
    {
        gNodeOfMac[Mac48Address::ConvertFrom(devs.Get(i)->GetAddress())] = i;
    }
    for (uint32_t i = 0; i < n; ++i)
    {
        auto d = DynamicCast<WifiNetDevice>(devs.Get(i));
        d->GetPhy()->TraceConnectWithoutContext("MonitorSnifferTx", MakeBoundCallback(&OnSnifferTx, i));
        d->GetPhy()->TraceConnectWithoutContext("MonitorSnifferRx", MakeBoundCallback(&OnSnifferRx, i));
        d->GetMac()->TraceConnectWithoutContext("DroppedMpdu", MakeBoundCallback(&OnDroppedMpdu, i));
    }
    if (!gConfig.stationDumpDir.empty())
    {
        WriteStationDumps();
    }

    gWall0 = std::chrono::steady_clock::now();
    Simulator::ScheduleNow(&PollControl);
    Simulator::ScheduleNow(&LagProbe);
    Simulator::Schedule(Seconds(gConfig.reportPeriodS), &PeriodicReport);
    std::cout << "running " << n << " nodes, " << gConfig.standard << ", " << gConfig.manager
              << std::endl;
    Simulator::Run();
    Report("final");
    for (uint32_t i = 0; i < gPeers.size(); ++i)
    {
        for (const auto& [j, p] : gPeers[i])
        {
            std::cout << "peer " << gConfig.nodes[i].name << " to=" << gConfig.nodes[j].name
                      << " tx_packets=" << p.txPackets << " tx_retries=" << p.txRetries
                      << " tx_failed=" << p.txFailed << " tx_expired=" << p.txExpired << std::endl;
        }
    }
    Simulator::Destroy();
    return 0;
}
