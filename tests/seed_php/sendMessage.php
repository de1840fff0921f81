<?php
require_once dirname(__FILE__)."/setup.php";
$data=file_get_contents("php://input");
$data=json_decode($data);
$clientId=$data->clientId;
$message=$data->message;
$socketMessage=array("message"=>$message);
$resp=array("error"=>false,"message"=>"");
$res=$serviceSocket->sendMessage($clientId,json_encode($socketMessage));
if($res!==true) {
	$resp["error"]=true;
	$resp["message"]=$res;
}
print json_encode($resp);
?>
