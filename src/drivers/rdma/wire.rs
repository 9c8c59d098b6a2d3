//! Everything the RDMA driver puts on the wire or into a `wr_id`, in one place.
//!
//! Three encodings, each with a total encode and a decode that rejects every value
//! net-rs never makes (with a [`WireError`] saying what is wrong, never a panic):
//!
//! * [`Imm`]: the 32-bit immediate data of every SEND_WITH_IMM. Bits 0..16 carry the
//!   credits being returned, bits 16..21 the [`ImmFlags`], bits 21..32 must be zero.
//!
//!   ```text
//!    31          21   20    19    18   17      16  15                       0
//!   +--------------+-----+-----+----+-------+----+--------------------------+
//!   | 0 (reserved) |PROBE|HELLO|FIN |CONTROL|LAST| credits returned (u16)   |
//!   +--------------+-----+-----+----+-------+----+--------------------------+
//!   ```
//!
//!   `CONTROL | PROBE` is a keepalive probe: a credit update that asks for an answer
//!   (sent only to a peer whose hello has the keepalive field, i.e. that knows it).
//!
//!   The value is handed to verbs as `imm_data` as it is (no byte swap): on the wire
//!   its four bytes are the sender's in-memory representation of the `u32`, which is
//!   how every release of net-rs has sent it. Peers of the same byte order agree; a
//!   big-endian and a little-endian host would not (kept so the wire does not change).
//! * [`Hello`]: the payload of the first message each side sends (sideway has no
//!   RDMA-CM private data), 28 bytes, all big-endian:
//!
//!   ```text
//!   0            4          8          12                     20          24          28
//!   +------------+----------+----------+----------------------+-----------+-----------+
//!   | magic: u32 | depth:   | chunk:   | max_message_size:    | mtu: u32  | keepalive:|
//!   | 4E 52 00 01| u32      | u32      | u64                  | bytes per | u32, ms   |
//!   | "NR", v1   | receives | bytes in | bytes in the largest | packet the| between   |
//!   |            | posted   | a buffer | message accepted     | port takes| probes    |
//!   +------------+----------+----------+----------------------+-----------+-----------+
//!   ```
//!
//!   The last two fields were appended in a later release of protocol 1. `mtu` is the
//!   active MTU of the sender's port: a peer whose queue pair's path MTU is larger
//!   sends it fragments of at most that many bytes, so every packet fits (RDMA-CM
//!   takes the path MTU from the connecting side, which may be more than the other
//!   side's link allows). `keepalive` is the sender's keepalive interval (0: off); its
//!   presence says the sender answers probes. A hello of 20 to 27 bytes (an earlier
//!   release) decodes with the fields it lacks as 0 and `None`; bytes past the last
//!   field are ignored, as they always were (a later version of protocol 1 may append
//!   fields that older peers skip).
//! * [`WrKind`]: the local numbering of work requests in `wr_id` (never sent): bit 63
//!   ([`WrId::DRIVER_TAG`]) clear is an op-slab id (sends of data, hello and FIN, whose
//!   memory the op slab owns until the completion); bit 63 set with bits 32..63 clear
//!   is a receive, the low 32 bits its buffer index; bit 63 plus bit 40 alone is a credit
//!   update (which names no memory).
//!
//!   ```text
//!    63  62        41  40  39       32  31                             0
//!   +---+------------+----+-----------+---------------------------------+
//!   | 0 | generation (31 bits)        | op-slab key (32 bits)           |  Op
//!   | 1 | 0          | 0  | 0         | receive buffer index (32 bits)  |  Recv
//!   | 1 | 0          | 1  | 0         | 0                               |  Control
//!   +---+------------+----+-----------+---------------------------------+
//!   ```
//!
//! Decoding a `wr_id` once into a [`WrKind`] is the only way completions are told
//! apart, so no caller depends on the order of its tests.
//!
//! The items are `pub` for the fuzz targets (`fuzz/`, through `crate::fuzzing` under
//! `cfg(fuzzing)`); otherwise the module is private to the driver.

use std::fmt;

use crate::error::{Error, ErrorKind};
use crate::reactor::credit::MAX_PIGGYBACK;
use crate::reactor::WrId;

/// Immediate-data flag bits (see the module docs for the layout).
const LAST: u32 = 1 << 16;
const CONTROL: u32 = 1 << 17;
const FIN: u32 = 1 << 18;
const HELLO: u32 = 1 << 19;
const PROBE: u32 = 1 << 20;
/// Bits of the immediate data that carry credits.
const CREDIT_MASK: u32 = 0xFFFF;

/// Bit 40 of a driver-tagged `wr_id`: the credit update.
const CONTROL_BIT: u64 = 1 << 40;

// The credit state machine never hands out more credits than one immediate carries.
const _: () = assert!(MAX_PIGGYBACK == Imm::MAX_CREDITS as u32);
// The hello fits the smallest receive buffer.
const _: () = assert!(Hello::LEN <= Hello::MIN_CHUNK as usize);
const _: () = assert!(Hello::MIN_LEN <= Hello::LEN);

/// Why a value read from a peer (immediate data, a hello) or from a completion (a
/// `wr_id`) is not one net-rs makes. Converts into an [`Error`] of kind
/// [`ErrorKind::InvalidData`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// Immediate data with bits 20..32 set (no flag uses them).
    ImmReservedBits {
        /// The whole immediate value.
        imm: u32,
    },
    /// Immediate data whose flags (bits 16..20) are not one of the five combinations
    /// the protocol sends (see [`ImmFlags`]).
    ImmFlags {
        /// The whole immediate value.
        imm: u32,
    },
    /// A hello shorter than [`Hello::MIN_LEN`] bytes.
    HelloShort {
        /// Its length in bytes.
        len: usize,
    },
    /// A hello that does not start with [`Hello::MAGIC`] (not net-rs, or another
    /// protocol version).
    HelloMagic {
        /// The first four bytes, big-endian.
        found: u32,
    },
    /// A hello announcing fewer than [`Hello::MIN_DEPTH`] receives or receive buffers
    /// smaller than [`Hello::MIN_CHUNK`] bytes.
    HelloLimits {
        /// The announced receive depth.
        depth: u32,
        /// The announced receive buffer size in bytes.
        chunk: u32,
    },
    /// A driver-tagged `wr_id` (bit 63 set) that is neither a receive nor the credit
    /// update.
    WrId {
        /// The whole `wr_id`.
        wr_id: u64,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HELLO_BAD: &str = "the peer's hello is not net-rs protocol 1";
        match *self {
            WireError::ImmReservedBits { imm } => write!(
                f,
                "immediate data {imm:#010x} has reserved bits 21..32 set ({:#x})",
                imm & !(CREDIT_MASK | LAST | CONTROL | FIN | HELLO | PROBE)
            ),
            WireError::ImmFlags { imm } => write!(
                f,
                "immediate data {imm:#010x} has flags {:#x}, not a combination net-rs sends \
                 (none, last, control, control|hello, fin, control|probe)",
                (imm >> 16) & 0x1F
            ),
            WireError::HelloShort { len } => write!(
                f,
                "{HELLO_BAD}: too short ({len} bytes, want at least {})",
                Hello::MIN_LEN
            ),
            WireError::HelloMagic { found } => write!(
                f,
                "{HELLO_BAD}: magic {found:#x} (want {:#x})",
                Hello::MAGIC
            ),
            WireError::HelloLimits { depth, chunk } => write!(
                f,
                "{HELLO_BAD}: depth {depth} / chunk {chunk} (want depth >= {} and chunk >= {})",
                Hello::MIN_DEPTH,
                Hello::MIN_CHUNK
            ),
            WireError::WrId { wr_id } => write!(
                f,
                "completion with wr_id {wr_id:#018x}: driver-tagged but neither a receive \
                 nor the credit update"
            ),
        }
    }
}

impl std::error::Error for WireError {}

impl From<WireError> for Error {
    fn from(e: WireError) -> Error {
        Error::new(ErrorKind::InvalidData, e.to_string())
    }
}

/// What a SEND_WITH_IMM carries, as its immediate data's flag bits 16..21. The
/// protocol sends exactly these six combinations; an enum makes the others
/// unrepresentable, and [`Imm::decode`] rejects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImmFlags {
    /// A fragment of a message, more follow (no flag bit).
    Fragment,
    /// The last (or only) fragment of a message (bit 16, `LAST`).
    LastFragment,
    /// A credit update with no payload (bit 17, `CONTROL`).
    CreditUpdate,
    /// The hello, whose payload is a [`Hello`] (bits 17 and 19, `CONTROL | HELLO`).
    Hello,
    /// End of stream: the peer sends nothing more; no payload (bit 18, `FIN`).
    Fin,
    /// A keepalive probe: a credit update that the receiver answers with one of its own
    /// (bits 17 and 20, `CONTROL | PROBE`).
    Probe,
}

impl ImmFlags {
    /// Every value, for tests and fuzzing.
    #[cfg(any(test, fuzzing))]
    pub const ALL: [ImmFlags; 6] = [
        ImmFlags::Fragment,
        ImmFlags::LastFragment,
        ImmFlags::CreditUpdate,
        ImmFlags::Hello,
        ImmFlags::Fin,
        ImmFlags::Probe,
    ];

    /// The flag bits, in place (bits 16..21 of the immediate data).
    pub const fn bits(self) -> u32 {
        match self {
            ImmFlags::Fragment => 0,
            ImmFlags::LastFragment => LAST,
            ImmFlags::CreditUpdate => CONTROL,
            ImmFlags::Hello => CONTROL | HELLO,
            ImmFlags::Fin => FIN,
            ImmFlags::Probe => CONTROL | PROBE,
        }
    }

    /// The flags of bits 16..21 of `imm` (other bits ignored), if they are a
    /// combination the protocol sends.
    const fn from_bits(imm: u32) -> Option<ImmFlags> {
        match imm & (LAST | CONTROL | FIN | HELLO | PROBE) {
            0 => Some(ImmFlags::Fragment),
            LAST => Some(ImmFlags::LastFragment),
            CONTROL => Some(ImmFlags::CreditUpdate),
            x if x == CONTROL | HELLO => Some(ImmFlags::Hello),
            FIN => Some(ImmFlags::Fin),
            x if x == CONTROL | PROBE => Some(ImmFlags::Probe),
            _ => None,
        }
    }

    /// Whether the payload is message bytes (a fragment or a last fragment).
    pub const fn is_data(self) -> bool {
        matches!(self, ImmFlags::Fragment | ImmFlags::LastFragment)
    }
}

/// The immediate data of a SEND_WITH_IMM: the receive credits the sender gives back and
/// what the message is. Encodes to the `u32` handed to verbs (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Imm {
    /// Receives the sender re-posted since it last said so: credits for the receiver of
    /// this message (at most [`Imm::MAX_CREDITS`] per message).
    pub credits: u16,
    /// What the message is.
    pub flags: ImmFlags,
}

impl Imm {
    /// Most credits one immediate carries (16 bits).
    pub const MAX_CREDITS: u16 = u16::MAX;

    /// The `imm_data` to post: `flags.bits() | credits`.
    pub const fn encode(self) -> u32 {
        self.flags.bits() | self.credits as u32
    }

    /// Read the immediate data of a receive completion.
    ///
    /// # Errors
    /// [`WireError::ImmReservedBits`] if any of bits 21..32 is set,
    /// [`WireError::ImmFlags`] if bits 16..21 are not one of the [`ImmFlags`].
    pub const fn decode(imm: u32) -> Result<Imm, WireError> {
        if imm >> 21 != 0 {
            return Err(WireError::ImmReservedBits { imm });
        }
        let Some(flags) = ImmFlags::from_bits(imm) else {
            return Err(WireError::ImmFlags { imm });
        };
        Ok(Imm {
            credits: (imm & CREDIT_MASK) as u16,
            flags,
        })
    }
}

/// What each side announces in its hello, the first message on every connection, so
/// the peers need not be configured alike. Encodes to [`Hello::LEN`] bytes (see the
/// module docs for the layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hello {
    /// Receives the sender keeps posted: the receiver's initial send credits.
    pub depth: u32,
    /// The sender's receive buffer size in bytes: fragments to it are at most this.
    pub chunk: u32,
    /// The largest message in bytes the sender accepts.
    pub max_message_size: u64,
    /// The active MTU of the sender's port in bytes (256 to 4096), the largest packet
    /// it can receive; 0 if the hello did not say (a release before the field).
    pub mtu: u32,
    /// The sender's keepalive interval in milliseconds (0: it sends no probes), and
    /// that it answers probes; `None` from a release before the field (which neither
    /// sends nor answers them).
    pub keepalive_ms: Option<u32>,
}

impl Hello {
    /// Bytes in an encoded hello.
    pub const LEN: usize = 28;
    /// Bytes in the shortest hello accepted (a release before the `mtu` field).
    pub const MIN_LEN: usize = 20;
    /// The first four bytes of every hello: "NR" and protocol version 1.
    pub const MAGIC: u32 = 0x4E52_0001;
    /// The smallest receive depth a peer may announce (see
    /// [`Credits::new`](crate::reactor::credit::Credits::new)).
    pub const MIN_DEPTH: u32 = 3;
    /// The smallest receive buffer in bytes a peer may announce (a hello must fit in
    /// one).
    pub const MIN_CHUNK: u32 = 64;

    /// The hello's bytes: magic, depth, chunk, max message size, MTU, keepalive (0 for
    /// `None`), all big-endian.
    pub fn encode(&self) -> [u8; Hello::LEN] {
        let mut b = [0u8; Hello::LEN];
        b[0..4].copy_from_slice(&Hello::MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&self.depth.to_be_bytes());
        b[8..12].copy_from_slice(&self.chunk.to_be_bytes());
        b[12..20].copy_from_slice(&self.max_message_size.to_be_bytes());
        b[20..24].copy_from_slice(&self.mtu.to_be_bytes());
        b[24..28].copy_from_slice(&self.keepalive_ms.unwrap_or(0).to_be_bytes());
        b
    }

    /// Read a peer's hello from the payload of the message flagged [`ImmFlags::Hello`].
    /// Bytes past [`Hello::LEN`] are ignored; a payload of [`Hello::MIN_LEN`] up to
    /// `LEN - 1` bytes (an earlier release) gives `mtu` 0 unless it has bytes 20..24,
    /// and `keepalive_ms` `None`.
    ///
    /// # Errors
    /// [`WireError::HelloShort`] under [`Hello::MIN_LEN`] bytes, [`WireError::HelloMagic`]
    /// without [`Hello::MAGIC`], [`WireError::HelloLimits`] for a depth under
    /// [`Hello::MIN_DEPTH`] or a chunk under [`Hello::MIN_CHUNK`].
    pub fn decode(b: &[u8]) -> Result<Hello, WireError> {
        let field = |at: usize| {
            b.get(at..at + 4)
                .map(|m| u32::from_be_bytes([m[0], m[1], m[2], m[3]]))
        };
        let (mtu, keepalive_ms) = (field(20).unwrap_or(0), field(24));
        let Some(b) = b.first_chunk::<{ Hello::MIN_LEN }>() else {
            return Err(WireError::HelloShort { len: b.len() });
        };
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let magic = word(0);
        if magic != Hello::MAGIC {
            return Err(WireError::HelloMagic { found: magic });
        }
        let mut max = [0u8; 8];
        max.copy_from_slice(&b[12..20]);
        let hello = Hello {
            depth: word(4),
            chunk: word(8),
            max_message_size: u64::from_be_bytes(max),
            mtu,
            keepalive_ms,
        };
        if hello.depth < Hello::MIN_DEPTH || hello.chunk < Hello::MIN_CHUNK {
            return Err(WireError::HelloLimits {
                depth: hello.depth,
                chunk: hello.chunk,
            });
        }
        Ok(hello)
    }
}

/// What a completion's `wr_id` names (see the module docs for the layout). Decode with
/// [`WrKind::try_from`]; encode with [`WrKind::to_u64`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WrKind {
    /// A send whose memory the op slab owns until the completion (a data fragment, the
    /// hello, the FIN): bit 63 clear.
    Op(WrId),
    /// The receive into buffer `index` of the connection's receive table.
    Recv(u32),
    /// A credit update: a SEND with no payload, so no memory to release.
    Control,
}

impl WrKind {
    /// The `wr_id` to post.
    pub fn to_u64(self) -> u64 {
        match self {
            WrKind::Op(id) => id.to_u64(),
            WrKind::Recv(index) => WrId::DRIVER_TAG | index as u64,
            WrKind::Control => WrId::DRIVER_TAG | CONTROL_BIT,
        }
    }
}

impl TryFrom<u64> for WrKind {
    type Error = WireError;

    /// Classify a completion's `wr_id`: every value is either one of the three kinds
    /// or an error.
    ///
    /// # Errors
    /// [`WireError::WrId`] for a driver-tagged value (bit 63 set) other than a receive
    /// (bits 32..63 clear) or the credit update (bit 40 alone).
    fn try_from(wr_id: u64) -> Result<WrKind, WireError> {
        if wr_id & WrId::DRIVER_TAG == 0 {
            return Ok(WrKind::Op(WrId::from_u64(wr_id)));
        }
        match wr_id & !WrId::DRIVER_TAG {
            CONTROL_BIT => Ok(WrKind::Control),
            rest if rest >> 32 == 0 => Ok(WrKind::Recv(rest as u32)),
            _ => Err(WireError::WrId { wr_id }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Today's exact encodings, as peers of every earlier release send and expect
    /// them. A change here breaks interoperation: bump the hello's protocol version.
    #[test]
    fn encodings_are_pinned() {
        // Immediate data: flag bits 16..21, credits in bits 0..16.
        let imm = |credits, flags| Imm { credits, flags }.encode();
        assert_eq!(imm(0, ImmFlags::Fragment), 0);
        assert_eq!(imm(0, ImmFlags::LastFragment), 0x0001_0000);
        assert_eq!(imm(0, ImmFlags::CreditUpdate), 0x0002_0000);
        assert_eq!(imm(0, ImmFlags::Fin), 0x0004_0000);
        assert_eq!(imm(0, ImmFlags::Hello), 0x000A_0000);
        assert_eq!(imm(7, ImmFlags::LastFragment), 0x0001_0007);
        assert_eq!(imm(0xFFFF, ImmFlags::CreditUpdate), 0x0002_FFFF);
        assert_eq!(imm(1, ImmFlags::Hello), 0x000A_0001);
        assert_eq!(imm(2, ImmFlags::Probe), 0x0012_0002);

        // The hello: "NR", version 1, then depth, chunk, max message size, MTU,
        // keepalive, big-endian.
        let hello = Hello {
            depth: 512,
            chunk: 4096,
            max_message_size: 8 << 20,
            mtu: 1024,
            keepalive_ms: Some(5000),
        };
        assert_eq!(
            hello.encode(),
            [
                0x4E, 0x52, 0x00, 0x01, // magic
                0x00, 0x00, 0x02, 0x00, // depth 512
                0x00, 0x00, 0x10, 0x00, // chunk 4096
                0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, // 8 MiB
                0x00, 0x00, 0x04, 0x00, // MTU 1024
                0x00, 0x00, 0x13, 0x88, // keepalive 5000 ms
            ]
        );
        assert_eq!(Hello::LEN, 28);
        // A hello of a release before the MTU field: the first 20 bytes, MTU 0, no
        // keepalive (it neither sends nor answers probes).
        assert_eq!(
            Hello::decode(&hello.encode()[..20]),
            Ok(Hello {
                mtu: 0,
                keepalive_ms: None,
                ..hello
            })
        );
        assert_eq!(&Hello::MAGIC.to_be_bytes(), b"NR\x00\x01");

        // wr_id: receives are bit 63 plus the index, the credit update bit 63 plus bit
        // 40, op-slab ids generation << 32 | key.
        assert_eq!(WrId::DRIVER_TAG, 0x8000_0000_0000_0000);
        assert_eq!(WrKind::Recv(0).to_u64(), 0x8000_0000_0000_0000);
        assert_eq!(WrKind::Recv(511).to_u64(), 0x8000_0000_0000_01FF);
        assert_eq!(WrKind::Recv(u32::MAX).to_u64(), 0x8000_0000_FFFF_FFFF);
        assert_eq!(WrKind::Control.to_u64(), 0x8000_0100_0000_0000);
        assert_eq!(
            WrKind::Op(WrId::new(3, 0x7FFF_FFFF)).to_u64(),
            0x7FFF_FFFF_0000_0003
        );
    }

    /// The transport's checks on [`ImmFlags`] mean what its old bit tests on the raw
    /// immediate meant, for every value a peer sends.
    #[test]
    fn flags_mean_what_the_old_bit_tests_meant() {
        for f in ImmFlags::ALL {
            let v = f.bits() | 9;
            let old_data = v & (CONTROL | FIN) == 0;
            assert_eq!(f.is_data(), old_data, "{f:?}");
            assert_eq!(
                f == ImmFlags::LastFragment,
                old_data && v & LAST != 0,
                "{f:?}"
            );
            assert_eq!(f == ImmFlags::Hello, v & HELLO != 0, "{f:?}");
            assert_eq!(f == ImmFlags::Fin, v & FIN != 0, "{f:?}");
            assert_eq!(Imm::decode(v).map(|i| i.credits), Ok((v & 0xFFFF) as u16));
        }
    }

    #[test]
    fn imm_decodes_what_old_peers_send() {
        assert_eq!(
            Imm::decode(0x0001_0005),
            Ok(Imm {
                credits: 5,
                flags: ImmFlags::LastFragment
            })
        );
        assert_eq!(
            Imm::decode(0x000A_0001),
            Ok(Imm {
                credits: 1,
                flags: ImmFlags::Hello
            })
        );
        assert_eq!(
            Imm::decode(0x0004_FFFF),
            Ok(Imm {
                credits: 0xFFFF,
                flags: ImmFlags::Fin
            })
        );
        assert_eq!(
            Imm::decode(0),
            Ok(Imm {
                credits: 0,
                flags: ImmFlags::Fragment
            })
        );
    }

    #[test]
    fn imm_rejects_malformed_values() {
        for imm in [1 << 21, 1 << 31, 0xFFFF_FFFF, 0x0020_0001] {
            let e = Imm::decode(imm).unwrap_err();
            assert_eq!(e, WireError::ImmReservedBits { imm });
            assert!(e.to_string().contains("reserved bits"), "{e}");
        }
        // Every flag combination the protocol does not send.
        let sent: Vec<u32> = ImmFlags::ALL.iter().map(|f| f.bits()).collect();
        let mut rejected = 0;
        for bits in 0..32u32 {
            let imm = bits << 16 | 3;
            if sent.contains(&(bits << 16)) {
                assert!(Imm::decode(imm).is_ok(), "{imm:#x}");
            } else {
                rejected += 1;
                let e = Imm::decode(imm).unwrap_err();
                assert_eq!(e, WireError::ImmFlags { imm });
                assert!(e.to_string().contains("not a combination"), "{e}");
            }
        }
        assert_eq!(rejected, 26);
        // HELLO or PROBE without CONTROL, LAST with FIN: all malformed.
        assert!(Imm::decode(HELLO).is_err());
        assert!(Imm::decode(PROBE).is_err());
        assert!(Imm::decode(CONTROL | HELLO | PROBE).is_err());
        assert!(Imm::decode(LAST | FIN).is_err());
    }

    #[test]
    fn hello_round_trips_and_ignores_trailing_bytes() {
        let h = Hello {
            depth: 3,
            chunk: 64,
            max_message_size: u64::MAX,
            mtu: 4096,
            keepalive_ms: Some(0),
        };
        assert_eq!(Hello::decode(&h.encode()), Ok(h));
        // A partial field is not a field.
        for len in Hello::MIN_LEN..Hello::LEN {
            let mtu = if len >= 24 { 4096 } else { 0 };
            let want = Hello {
                mtu,
                keepalive_ms: None,
                ..h
            };
            assert_eq!(Hello::decode(&h.encode()[..len]), Ok(want));
        }
        let mut longer = h.encode().to_vec();
        longer.extend_from_slice(b"future fields");
        assert_eq!(Hello::decode(&longer), Ok(h));
    }

    #[test]
    fn hello_rejects_malformed_payloads() {
        let good = Hello {
            depth: 16,
            chunk: 4096,
            max_message_size: 1 << 20,
            mtu: 1024,
            keepalive_ms: Some(1000),
        }
        .encode();
        for len in 0..Hello::MIN_LEN {
            let e = Hello::decode(&good[..len]).unwrap_err();
            assert_eq!(e, WireError::HelloShort { len });
            assert!(e.to_string().contains("too short"), "{e}");
        }
        let mut bad = good;
        bad[3] = 2; // protocol version 2
        let e = Hello::decode(&bad).unwrap_err();
        assert_eq!(e, WireError::HelloMagic { found: 0x4E52_0002 });
        assert!(e.to_string().contains("magic 0x4e520002"), "{e}");

        let limits = |depth, chunk| {
            Hello::decode(
                &Hello {
                    depth,
                    chunk,
                    max_message_size: 0,
                    mtu: 0,
                    keepalive_ms: None,
                }
                .encode(),
            )
        };
        assert_eq!(
            limits(2, 4096),
            Err(WireError::HelloLimits {
                depth: 2,
                chunk: 4096
            })
        );
        assert_eq!(
            limits(16, 63),
            Err(WireError::HelloLimits {
                depth: 16,
                chunk: 63
            })
        );
        assert!(limits(3, 64).is_ok());
        let e: Error = limits(0, 0).unwrap_err().into();
        assert_eq!(e.kind(), ErrorKind::InvalidData);
        assert!(e.to_string().contains("not net-rs protocol 1"), "{e}");
    }

    #[test]
    fn wr_id_classifies_each_kind() {
        assert_eq!(WrKind::try_from(0x8000_0100_0000_0000), Ok(WrKind::Control));
        assert_eq!(
            WrKind::try_from(0x8000_0000_0000_002A),
            Ok(WrKind::Recv(42))
        );
        // Index 0 of a receive is not the credit update, nor an op id.
        assert_eq!(WrKind::try_from(WrId::DRIVER_TAG), Ok(WrKind::Recv(0)));
        assert_eq!(WrKind::try_from(0), Ok(WrKind::Op(WrId::new(0, 0))));
        assert_eq!(
            WrKind::try_from(0x0000_0100_0000_0000),
            Ok(WrKind::Op(WrId::new(0, 0x100))),
            "bit 40 without the driver tag is an op id's generation"
        );
        // The control id's low bits are not a receive index (the old code relied on
        // testing for it first).
        assert_ne!(
            WrKind::try_from(WrKind::Control.to_u64()),
            Ok(WrKind::Recv(0))
        );
    }

    #[test]
    fn wr_id_rejects_malformed_driver_ids() {
        for wr_id in [
            WrId::DRIVER_TAG | 1 << 32,
            WrId::DRIVER_TAG | CONTROL_BIT | 1,
            WrId::DRIVER_TAG | 1 << 62,
            u64::MAX,
        ] {
            let e = WrKind::try_from(wr_id).unwrap_err();
            assert_eq!(e, WireError::WrId { wr_id });
            assert!(e.to_string().contains("neither a receive"), "{e}");
        }
    }

    fn flags() -> impl Strategy<Value = ImmFlags> {
        prop::sample::select(ImmFlags::ALL.to_vec())
    }

    fn wr_kind() -> impl Strategy<Value = WrKind> {
        prop_oneof![
            (any::<u32>(), 0..=0x7FFF_FFFFu32).prop_map(|(k, g)| WrKind::Op(WrId::new(k, g))),
            any::<u32>().prop_map(WrKind::Recv),
            Just(WrKind::Control),
        ]
    }

    proptest! {
        #[test]
        fn imm_round_trips(credits in any::<u16>(), flags in flags()) {
            let imm = Imm { credits, flags };
            prop_assert_eq!(Imm::decode(imm.encode()), Ok(imm));
        }

        #[test]
        fn imm_decode_is_exact(v in any::<u32>()) {
            // Whatever decodes encodes back to the same bits; nothing else decodes.
            match Imm::decode(v) {
                Ok(imm) => prop_assert_eq!(imm.encode(), v),
                Err(WireError::ImmReservedBits { imm }) => {
                    prop_assert_eq!(imm, v);
                    prop_assert!(v >> 21 != 0);
                }
                Err(WireError::ImmFlags { imm }) => {
                    prop_assert_eq!(imm, v);
                    prop_assert!(ImmFlags::ALL.iter().all(|f| f.bits() != v & 0x1F_0000));
                }
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
        }

        #[test]
        fn hello_round_trips(
            depth in Hello::MIN_DEPTH..=u32::MAX,
            chunk in Hello::MIN_CHUNK..=u32::MAX,
            max_message_size in any::<u64>(),
            mtu in any::<u32>(),
            keepalive_ms in any::<u32>(),
        ) {
            let keepalive_ms = Some(keepalive_ms);
            let h = Hello { depth, chunk, max_message_size, mtu, keepalive_ms };
            prop_assert_eq!(Hello::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn hello_decode_is_exact(b in prop::collection::vec(any::<u8>(), 0..40)) {
            // Whatever decodes is the payload's whole fields (20, 24 or 28 bytes; the
            // missing ones 0 and None); a hello built from those bytes' magic, with
            // valid limits, always decodes.
            if let Ok(h) = Hello::decode(&b) {
                let n = [Hello::LEN, 24, Hello::MIN_LEN]
                    .into_iter()
                    .find(|&n| b.len() >= n)
                    .unwrap();
                prop_assert_eq!(&h.encode()[..n], &b[..n]);
                prop_assert!(n >= 24 || h.mtu == 0);
                prop_assert_eq!(h.keepalive_ms.is_some(), n == Hello::LEN);
            }
            let mut fixed = b.clone();
            fixed.resize(fixed.len().max(Hello::MIN_LEN), 0);
            fixed[..4].copy_from_slice(&Hello::MAGIC.to_be_bytes());
            fixed[4..8].copy_from_slice(&Hello::MIN_DEPTH.to_be_bytes());
            fixed[8..12].copy_from_slice(&Hello::MIN_CHUNK.to_be_bytes());
            prop_assert!(Hello::decode(&fixed).is_ok());
        }

        #[test]
        fn wr_id_round_trips(kind in wr_kind()) {
            prop_assert_eq!(WrKind::try_from(kind.to_u64()), Ok(kind));
        }

        #[test]
        fn wr_id_decode_is_exact(v in any::<u64>()) {
            match WrKind::try_from(v) {
                Ok(kind) => prop_assert_eq!(kind.to_u64(), v),
                Err(e) => {
                    prop_assert_eq!(e, WireError::WrId { wr_id: v });
                    prop_assert!(v & WrId::DRIVER_TAG != 0);
                }
            }
        }

        #[test]
        fn driver_tagged_junk_is_rejected(high in 1..(1u64 << 31), low in any::<u32>()) {
            // Bits 32..63 set other than bit 40 alone with a zero index.
            let v = WrId::DRIVER_TAG | high << 32 | u64::from(low);
            prop_assume!(v != WrKind::Control.to_u64());
            prop_assert_eq!(WrKind::try_from(v), Err(WireError::WrId { wr_id: v }));
        }
    }
}
