//! Ring records as the storage-writer reads them: decoding must never
//! panic, and a record that decodes encodes to something that decodes the same.
#![no_main]
use chat_protocol::records::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Record::Message(message)) = Record::decode(data) {
        let encoded = message.encode();
        let again = Record::decode(&encoded).expect("a re-encoded message decodes");
        assert_eq!(Record::Message(message), again);
    }
});
